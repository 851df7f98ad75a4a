"""The grid of a sweep: `--grid key=v1,v2` lists, their cartesian product as points, each
named from its values and given its run directory and overrides, every point's config
checked before anything trains."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import re

from sc_jax.config import ConfigError

RESERVED = ("train.run_dir", "train.steps")  # set by the sweep for every point


@dataclasses.dataclass
class Point:
    name: str
    values: dict[str, str]  # grid key -> value as written on the command line
    overrides: list[str]  # everything after --config for sc_jax.train (common, grid, run_dir, steps)
    run_dir: str


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    grid, seen = [], set()
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        values = [v.strip() for v in raw.split(",")] if sep else []
        if not key or not sep or not values or any(v == "" for v in values):
            raise ConfigError(f"--grid '{spec}' is not of the form key.sub=v1,v2,...")
        if key in seen:
            raise ConfigError(f"--grid key '{key}' is given twice: list all its values in one --grid")
        if key in RESERVED:
            raise ConfigError(f"'{key}' is set by the sweep for each point (use --steps and --out)")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid '{spec}' repeats a value")
        seen.add(key)
        grid.append((key, values))
    return grid


def short_keys(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that tells it apart from the others."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        out[key] = suffix
    return out


def point_name(values: dict[str, str], shorts: dict[str, str]) -> str:
    if not values:
        return "default"
    name = "_".join(f"{shorts[k]}-{re.sub(r'[^A-Za-z0-9.+-]', '_', v)}" for k, v in values.items())
    if len(name) > 120:  # keep file names sane; the hash keeps them distinct
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def plan_points(grid, common: list[str], steps: int, out: str) -> list[Point]:
    for o in common:
        key = o.split("=", 1)[0]
        if key in RESERVED:
            raise ConfigError(f"'{key}' is set by the sweep for each point (use --steps and --out)")
        if key in dict(grid):
            raise ConfigError(f"'{key}' is both a --grid key and a common override: keep one")
    shorts = short_keys([k for k, _ in grid])
    points, names = [], {}
    for combo in itertools.product(*[vals for _, vals in grid]):
        values = dict(zip([k for k, _ in grid], combo))
        name = point_name(values, shorts)
        if name in names:
            raise ConfigError(f"grid points {names[name]} and {values} get the same name '{name}': "
                              "use values that differ in letters, digits, '.', '+' or '-'")
        names[name] = values
        run_dir = os.path.join(out, name)
        overrides = [*common, *(f"{k}={v}" for k, v in values.items()), f"train.run_dir={run_dir}",
                     f"train.steps={steps}"]
        points.append(Point(name, values, overrides, run_dir))
    return points


def validate(config: str | None, points: list[Point]) -> dict:
    """Every point's Config. A ConfigError names the first bad point unless every point
    fails the same way (a mistyped key, a bad common override)."""
    from sc_jax.train.config import load_config

    cfgs, errors = {}, {}
    for p in points:
        try:
            cfgs[p.name] = load_config(config, p.overrides)
        except ConfigError as e:
            errors[p.name] = str(e)
    if errors:
        name, msg = next(iter(errors.items()))
        if len(errors) < len(points) or len(set(errors.values())) > 1:
            msg += f" (point {name})"
        raise ConfigError(msg)
    return cfgs
