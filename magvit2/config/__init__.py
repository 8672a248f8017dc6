"""Everything decided from a composed config before any work starts, one job per module:
resolvers (conf/'s `${...}` functions), schema (the choice-like settings and their values), validate (the checks the
plan runs for every member), identity (signatures, run dirs, member names), migrate (stored configs -> today's).
Torch-free: the plan step (dry run, sweeper) imports it and nothing heavier.
"""
from magvit2.config import resolvers  # noqa: F401  (registers the resolvers conf/ uses)
from magvit2.config.identity import (ar_signature, choices, member_name, run_dir, signature, to_dict,
                                     token_cache_key, tokenizer_config, tokenizer_seed, tokenizer_signature,
                                     tokenizer_source)
from magvit2.config.migrate import load, migrate
from magvit2.config.schema import CHOICES, STAGES, check_choices
from magvit2.config.validate import (SAMPLER_CACHE, SAMPLER_COMPILE, sampler_settings, subtoken_values,
                                     tokens_settings, validate)
from magvit2.data.identity import absolute_data_path
from magvit2.errors import ConfigError

__all__ = ["CHOICES", "ConfigError", "SAMPLER_CACHE", "SAMPLER_COMPILE", "STAGES", "absolute_data_path", "ar_signature",
           "check_choices", "choices", "load", "member_name", "migrate", "run_dir", "sampler_settings", "signature",
           "subtoken_values", "to_dict", "token_cache_key", "tokenizer_config", "tokenizer_seed", "tokenizer_signature",
           "tokenizer_source", "tokens_settings", "validate"]
