"""`python -m worker.oneshot`: one operation on a real SQLite file, the dispatcher's text
answers, and the exit codes of the `docker run` baseline (bench/docker_run.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conventions.users import account_db, user_dir
from worker import oneshot
from worker.store import Store


def run(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str,
        user: str = "koduki") -> tuple[int, str, str]:
    code = oneshot.main(["--user", user, "--data-dir", str(data_dir), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_walkthrough_answers_as_the_text_routes_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, tmp_path, "create") == (
        0, "Hello, koduki. Welcome Unlimited Process Works!\n", "")
    assert run(capsys, tmp_path, "deposit", "128")[1] == "koduki's account deposit 128 yen.\n"
    assert run(capsys, tmp_path, "deposit", "128")[1] == "koduki's account deposit 128 yen.\n"
    assert run(capsys, tmp_path, "show") == (0, "koduki's account is 256 yen.\n", "")
    # Creating again is idempotent and greets the same way.
    assert run(capsys, tmp_path, "create")[:2] == (
        0, "Hello, koduki. Welcome Unlimited Process Works!\n")

    store = Store.open(account_db(tmp_path, "koduki"), user="koduki")
    try:
        assert [(e.seq, e.amount, e.balance) for e in store.entries(0, 10)] == [
            (1, 0, 0), (2, 128, 128), (3, 128, 256)]
        # Nothing is shipped: the rows stay above the watermark, and the marker says so.
        assert store.acked_seq() == 0
        assert store.marker.exists()
    finally:
        store.close()


@pytest.mark.parametrize(("args", "user", "code", "message"), [
    (["show"], "nobody", oneshot.EXIT_REFUSED, "does not exist"),
    (["deposit", "5"], "nobody", oneshot.EXIT_REFUSED, "does not exist"),
    (["show"], "Koduki", oneshot.EXIT_USAGE, "is invalid"),
])
def test_refusals_exit_non_zero_and_say_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
    args: list[str], user: str, code: int, message: str,
) -> None:
    found, out, err = run(capsys, tmp_path, *args, user=user)

    assert (found, out) == (code, "")
    assert message in err


def test_an_invalid_amount_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, tmp_path, "create")

    code, out, err = run(capsys, tmp_path, "deposit", "0")

    assert (code, out) == (oneshot.EXIT_REFUSED, "")
    assert "amount 0" in err


def test_an_unknown_user_leaves_nothing_on_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, tmp_path, "show", user="nobody")

    assert not user_dir(tmp_path, "nobody").exists()


def test_it_runs_as_a_module(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "worker.oneshot", "--user", "misuzu", "--data-dir",
         str(tmp_path), "create"], capture_output=True, text=True, check=False)

    assert (done.returncode, done.stdout) == (
        0, "Hello, misuzu. Welcome Unlimited Process Works!\n")
