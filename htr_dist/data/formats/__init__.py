"""Input formats for ``htr-prepare``: each parser turns its source into common line records (see
:mod:`htr_dist.data.formats.base`), and :mod:`htr_dist.data.prepare` writes the shards once for all of them.

Adding a format: one file here with a ``collect(opt, report) -> Collected`` function and a :class:`Format` object,
and its line in :data:`FORMATS`.
"""

from typing import Dict

from htr_dist.data.formats import alto, iam, lines, page, reference
from htr_dist.data.formats.base import Format

FORMATS: Dict[str, Format] = {f.name: f for f in (iam.IAM, iam.IAM_LINES, lines.LINES, reference.REFERENCE,
                                                  page.PAGE, alto.ALTO)}
"""Format name -> its parser; ``htr-prepare --help`` lists them in this order."""

