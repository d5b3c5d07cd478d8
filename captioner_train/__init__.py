"""The project's training side, apart from the `captioner` library the Space imports (as open_clip keeps
`open_clip_train` apart from `open_clip`): model building and presets (`architecture`), tokenizers
(`vocabulary`), the synthetic scenes (`synthetic`), datasets (`data`), the training entry point (`train`),
evaluation (`pointing`, `evaluate`, `faithfulness`), the benchmark (`bench`) and the header and Markdown writer
their `--markdown FILE` shares (`report`). It imports `captioner`; never the other way round.

    python -m captioner_train.train --out runs/scenes ...
    python -m captioner_train.evaluate assets/model --markdown evaluation.md
    python -m captioner_train.bench --markdown performance.md
"""
