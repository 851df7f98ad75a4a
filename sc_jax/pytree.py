"""Parameter trees as nested dicts addressed by dotted paths ("model.norm.weight"): the
one naming shared by conversion, checkpoints and error messages."""

from __future__ import annotations


def get_path(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def set_path(tree: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for key in head:
        tree = tree.setdefault(key, {})
    tree[last] = value


def dotted(keypath) -> str:
    """A jax key path (DictKey, GetAttrKey, ...) as a dotted path."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)
