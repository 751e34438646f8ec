"""Entry point: ``python -m pipeline {fit,validate,test,export} ...``."""

import sys

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def _run() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "fit":  # USR1 before the imports: they take seconds
        from pipeline.early_signals import hold

        hold()
    if len(sys.argv) > 1 and sys.argv[1] in ("fit", "validate", "test"):  # before the trainer's imports
        from pipeline.temp_dir import temp_dir_problem

        if (problem := temp_dir_problem()) is not None:  # ended as a refusal by the CLI ends, below
            from pipeline.launcher_ranks import after_exit as tell_rank_zero
            from pipeline.torchrun_stop import after_exit

            print(f"error: {problem}", file=sys.stderr)
            sys.exit(tell_rank_zero(after_exit(2), False))
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from pipeline.export import main as export_main

        sys.exit(export_main(sys.argv[2:]))
    from pipeline.cli import main
    from pipeline.launcher_ranks import after_exit as tell_rank_zero
    from pipeline.torchrun_stop import after_exit, peer_ended, watch_the_error_file

    watching = watch_the_error_file()  # a rank of this round that ended with its error: line
    try:
        status = main()
    except SystemExit as e:  # the parser's refusal: its usage, then an `error:` line, exit 2
        if not isinstance(e.code, int):
            raise
        status = e.code
    finally:
        if watching is not None:
            watching.set()
    sys.exit(tell_rank_zero(after_exit(status), peer_ended()))


if __name__ == "__main__":
    try:
        _run()
    except KeyboardInterrupt:  # Ctrl-C before the trainer's own handling (the imports take seconds): one line, not
        # the 40-line traceback through torch's imports
        print("python -m pipeline: interrupted (Ctrl-C); rerun the command to start or resume the run",
              file=sys.stderr, flush=True)
        import os
        import signal

        # ended by SIGINT itself, as Python ends an uncaught Ctrl-C: a shell script around the command then stops
        # too (an exit status of 130 tells bash the command handled it, and the script went on)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        sys.exit(INTERRUPTED)  # (where the signal cannot end it)
