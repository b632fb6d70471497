"""gatetune.core: what models/, tuning/ and results/ share, with no torch, Ray or pandas behind it.

    errors   UserError (one line: file, key, problem, fix), CheckpointError, nearest ("did you mean")
    layout   the names of every file in a run folder (search and `gatetune train`)
    trials   the trial vocabulary: Status and classify (how a trial ended), a trial's role (replicas, pretrain)
    storage  RunStore, a run folder as a path or a URI (s3://, gs://): write, append, prune; write_atomic
    cache    the per-machine cache folder
    dotted   dotted config keys on plain dicts: get/set, flatten, diff, a trial's effective config
"""
