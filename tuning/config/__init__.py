"""One typed config for a training run or a search, loaded from YAML.

    cfg = load("search_spaces/digits.yaml", ["train.epochs=3"])   # read, validate, check the machine
    cfg.gating.density, cfg.train.phases, cfg.search.scheduler.name ...

Four jobs, one module each:
    schema       the pydantic models: every key, its type, range and documentation
    loader       YAML files, `_import`, dotted overrides, the notebook's Mayo files (mayo.py)
    validate     raw dict -> Config, every mistake as one UserError line (file, key, fix); no I/O
    environment  the weights file, data root and GPU, once per command
plus resolve.py, what a valid config means for a network (site specs, training phases), and track.py,
search.track's keys (MLflow, W&B) and their checks.
"""
from gatetune.core.dotted import config_diff, get_dotted, set_dotted
from gatetune.tuning.config.environment import check_environment
from gatetune.tuning.config.loader import merge, parse_override, read_config, read_file
from gatetune.tuning.config.resolve import Phase, phases, site_specs
from gatetune.tuning.config.schema import (Config, DataCfg, GatingCfg, LrScheduleCfg, ModelCfg, OptimizerCfg,
                                           PhaseCfg, ResourcesCfg, SchedulerCfg, SearchCfg, SiteCfg, TrainCfg,
                                           config_keys, key_pattern)
from gatetune.tuning.config.validate import load, load_dict, to_dict, with_params

__all__ = ["Config", "ModelCfg", "DataCfg", "GatingCfg", "SiteCfg", "TrainCfg", "OptimizerCfg", "LrScheduleCfg",
           "PhaseCfg", "SearchCfg", "SchedulerCfg", "ResourcesCfg", "load", "load_dict", "with_params", "to_dict",
           "check_environment", "read_config", "read_file", "merge", "parse_override", "get_dotted", "set_dotted",
           "config_diff", "config_keys", "key_pattern", "site_specs", "Phase", "phases"]
