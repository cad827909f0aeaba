"""The deployment walk-throughs of docs/operations.md are exactly what the live tests run.

tests/test_compose_live.py and tests/test_systemd_live.py (``make compose-test``, ``make
systemd-test``) need docker and run outside ``make test``; this module checks, without docker, that
the docs' command blocks are still the commands those tests hold and run, so the runbook cannot
drift from what is tested.
"""

from __future__ import annotations

from tests import test_compose_live
from tests.docker_support import doc_commands


def test_docs_compose_section_is_what_the_compose_test_runs() -> None:
    assert doc_commands(test_compose_live.DOC_HEADING) == test_compose_live.DOC_COMMANDS
