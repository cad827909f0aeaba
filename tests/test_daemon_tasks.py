"""The daemon's own tasks at shutdown: every one is cancelled and awaited, also one started while
the others were being awaited (a leadership gained during the stop starts the founder duties)."""

from __future__ import annotations

import asyncio
import types
from typing import Any

from quorumd.node.daemon.root import Daemon


def test_a_task_started_while_the_stop_waits_is_cancelled_and_awaited_too() -> None:
    async def main() -> list[asyncio.Task[Any]]:
        loop = asyncio.get_running_loop()
        owner = types.SimpleNamespace(_tasks=[])

        async def late_duty() -> None:
            await asyncio.Event().wait()

        async def duty() -> None:
            try:
                await asyncio.Event().wait()
            finally:  # as a role change during the stop does: one more task of the daemon's own
                owner._tasks.append(loop.create_task(late_duty(), name="late"))

        owner._tasks.append(loop.create_task(duty(), name="duty"))
        await asyncio.sleep(0)  # (both tasks started: the first waits on its event)
        async with asyncio.timeout(5):
            await Daemon._cancel_tasks(owner)  # type: ignore[arg-type]
        return list(owner._tasks)

    tasks = asyncio.run(main())
    assert [t.get_name() for t in tasks] == ["duty", "late"]
    assert all(t.done() for t in tasks)


def test_finished_leadership_duties_are_not_kept() -> None:
    async def main() -> int:
        owner = types.SimpleNamespace(_tasks=[])
        loop = asyncio.get_running_loop()

        async def quick() -> None:
            return None

        for _ in range(50):
            Daemon._keep_task(owner, loop.create_task(quick()))  # type: ignore[arg-type]
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        return len(owner._tasks)

    assert asyncio.run(main()) <= 1
