"""`python -m captioner.evaluate MODEL ...`: the held-out evaluation, also under the library's name.

It lives in `captioner_train.evaluate` (it needs the training side's scenes and pycocoevalcap, which the Space
does not install); this module only runs it. Under `torchrun --nproc_per_node N` the scenes are split between
the processes and the figures equal one process's.
"""
from captioner_train.evaluate import main

if __name__ == "__main__":
    main()
