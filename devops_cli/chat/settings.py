"""Generation settings of a chat: the names /set and the flags accept, their rules, and the defaults a
model's generation_config gives them."""

from __future__ import annotations

import math

from devops_cli.errors import DevopsError, did_you_mean

# name -> (type, check, what the check means); the only names /set and the options accept
SETTINGS = {
    "temperature": (float, lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "repetition_penalty": (float, lambda v: v > 0, "a number > 0 (1 = off)"),
    "max_new_tokens": (int, lambda v: v >= 1, "an integer >= 1"),
    "min_new_tokens": (int, lambda v: v >= 0, "an integer >= 0"),
    "do_sample": (bool, lambda v: True, "on or off"),
}
_FROM_CONFIG = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


def parse_setting(name: str, text: str):
    """'0.7' -> 0.7 for temperature, 'off' -> False for do_sample; DevopsError with the rule otherwise."""
    if name not in SETTINGS:
        names = [*SETTINGS, "seed", "max_window"]
        raise DevopsError(f"unknown setting '{name}'", hint=did_you_mean(name, names, quote="") or f"one of: {', '.join(names)}")
    kind, check, rule = SETTINGS[name]
    try:
        if kind is bool:
            if text.lower() not in ("on", "off", "true", "false", "1", "0"):
                raise ValueError
            value = text.lower() in ("on", "true", "1")
        else:
            value = kind(text)
    except ValueError:
        raise DevopsError(f"{name} must be {rule}, got '{text}'") from None
    if kind is float and not math.isfinite(value):
        raise DevopsError(f"{name} must be a finite number ({rule}), got '{text}'")
    if not check(value):
        raise DevopsError(f"{name} must be {rule}, got '{text}'")
    return value


def settings_from(generation_config, overrides: dict) -> dict:
    """Defaults from the model's generation_config, then the user's overrides (None = not given)."""
    settings = {}
    for name in _FROM_CONFIG:
        value = getattr(generation_config, name, None)
        if value is not None:
            settings[name] = value
    settings.setdefault("max_new_tokens", 512)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("temperature") is not None:  # a temperature given means: sample (0 means greedy)
        settings["do_sample"] = overrides["temperature"] > 0
    return settings
