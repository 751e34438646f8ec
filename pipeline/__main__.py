"""Entry point: ``python -m pipeline {fit,validate,test,export} ...``."""

import sys

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "fit":  # USR1 before the imports: they take seconds
        from pipeline.early_signals import hold

        hold()
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from pipeline.export import main as export_main

        sys.exit(export_main(sys.argv[2:]))
    from pipeline.cli import main

    sys.exit(main())
