"""Many requests for one new user at once: one worker, an exact balance, PostgreSQL agrees."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import RunningStack


@pytest.mark.parametrize("runtime", ["process", "docker"])
def test_fifty_concurrent_deposits_share_one_worker(
    make_stack: Callable[..., RunningStack], runtime: str
) -> None:
    stack = make_stack(runtime=runtime)
    user = "hayate"
    assert stack.http.get(f"/{user}/create").status == 200
    amounts = list(range(1, 51))

    def deposit(amount: int) -> int:
        return stack.http.get(f"/{user}/deposit/{amount}").status

    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(deposit, amounts))

    assert statuses == [200] * 50
    assert stack.http.get(f"/{user}/show").text == f"{user}'s account is {sum(amounts)} yen.\n"
    assert stack.worker_starts(user) == 1
    assert stack.live_workers(user) == 1
    if runtime == "docker":
        assert len(stack.containers(user)) == 1

    ledger = stack.wait_for_postgres(user)
    assert [seq for seq, _ in ledger] == list(range(1, 52))
    assert stack.pg_rows("SELECT balance FROM accounts WHERE user_name = %s", user) == [(1275,)]


def test_concurrent_first_requests_start_one_worker(stack: RunningStack) -> None:
    user = "vivio"

    def create(_: int) -> int:
        return stack.http.get(f"/{user}/create").status

    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(create, range(20)))

    assert statuses == [200] * 20
    assert stack.worker_starts(user) == 1
    assert [seq for seq, _ in stack.sqlite_ledger(user)] == [1]
