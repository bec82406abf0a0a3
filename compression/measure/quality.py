"""The shipped text of another domain, measured next to the calibration-domain eval text.

``kjv_genesis.txt`` is Genesis 1-30 of the King James Version (1611, public domain), taken from
Debian's ``bible-kjv-text`` package (see ``compression/data/README.md``): English prose far from
the WikiText articles the default calibration and eval texts come from."""

from __future__ import annotations

from functools import cache
from importlib import resources

OTHER_TEXT_NAME = "King James Version, Genesis 1-30 (public domain, shipped)"


@cache
def other_domain_text() -> str:
    pkg = __package__.rsplit(".", 1)[0]
    return resources.files(pkg).joinpath("data/kjv_genesis.txt").read_text("utf-8")
