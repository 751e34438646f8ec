"""The start of a ``sitecustomize.py`` that test harnesses write for the processes a test starts (ranks of
Lightning's launcher, of torchrun): ``after_import(name, patch)`` calls ``patch(module)`` once ``name`` is first
imported there, to make one rank fail or stall in a way no setting can (every setting agrees across ranks)."""

AFTER_IMPORT = '''
import importlib.machinery, sys


def after_import(name, patch):
    class _Hook:
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                patch(module)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Hook())
'''
