"""Helpers for configs/*.py (big_vision style variants after the colon)."""

import ml_collections


def parse_arg(arg, **defaults):
  """'a=1,b=x,runlocal' -> ConfigDict over ``defaults`` (big_vision style); bare names are True."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config variant {key!r} is unknown; allowed: {sorted(defaults)}")
    if not value:
      out[key] = True
    else:
      out[key] = type(defaults[key])(value) if not isinstance(defaults[key], bool) else value in ("1", "true", "True")
  return out
