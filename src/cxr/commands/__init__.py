"""The `cxr` subcommands, one module per group: each command's options sit beside its handler.

Every module has `register(sub)`, which adds its parsers and sets `func` (the handler) on each;
handlers import what they need (torch included) inside, so `cxr --help` and argument mistakes
cost no torch import. Shared option groups and validators are in `options.py`.
"""

from . import adapt, check, data, deploy, inspect, monitor, pretrain, train

GROUPS = (train, pretrain, inspect, check, deploy, monitor, adapt, data)  # the order of `cxr --help`
