"""The CLI's commands: one module per command, imported only when that command runs.

Each module defines ``add_arguments(parser)`` (its options) and ``run(args) -> int`` (its exit
code); a command with sub-commands (``data``, ``bench``, ``nnunet``) adds them in
``add_arguments`` and ``run`` dispatches. The modules import their library code inside ``run``,
so ``beseg COMMAND --help`` costs the import of that module alone. :mod:`beseg.cli` lists the
commands with their one-line help and builds only the invoked command's parser.
"""
