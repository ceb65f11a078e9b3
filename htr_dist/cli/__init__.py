"""The command-line entry points. Each module has ``main(argv=None) -> int``; setup.py installs them as console
scripts (``htr-train``, ``htr-prepare``, ...) and ``launch/*.py`` are thin files that call them, for launchers that
take a script path (``deepspeed launch/train.py``)."""
