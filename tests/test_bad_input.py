"""Bad input through Envoy: a clear status and message, and no file outside the user's own
directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from conventions.users import user_dir
from tests.conftest import RunningStack

INT64_MAX = 2**63 - 1


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def koduki(stack: RunningStack) -> RunningStack:
    assert stack.http.get("/koduki/create").status == 200
    assert stack.http.get("/koduki/deposit/100").status == 200
    return stack


@pytest.mark.parametrize(("target", "status", "message"), [
    ("/../create", 400, "user name '..' is invalid"),
    ("/..%2F..%2Fetc/create", 400, "is invalid"),
    ("/a%2Fb/show", 400, "is invalid"),
    ("/Koduki/create", 400, "user name 'Koduki' is invalid"),
    ("/" + "a" * 64 + "/create", 400, "is invalid"),
    ("/-dash/create", 400, "is invalid"),
    ("/koduki/show?user=misuzu", 400, "query parameter"),
    ("/koduki/deposit/5?amount=500000", 400, "query parameter"),
    ("/v1/accounts/koduki?user=misuzu", 400, "query parameter"),
    ("/koduki/deposit/abc", 400, "amount 'abc' is not a positive whole number"),
    ("/koduki/deposit/0", 400, "at least 1 yen"),
    ("/koduki/deposit/-5", 400, "amount '-5' is not a positive whole number"),
    ("/koduki/deposit/1.5", 400, "is not a positive whole number"),
    (f"/koduki/deposit/{INT64_MAX + 1}", 400, "exceeds the largest balance"),
    (f"/koduki/deposit/{INT64_MAX}", 400, "exceed"),  # 100 + INT64_MAX overflows the balance
    ("/nobody/show", 404, "does not exist"),
    ("/nobody/deposit/5", 404, "does not exist"),
])
def test_bad_requests(koduki: RunningStack, target: str, status: int, message: str) -> None:
    before = files_under(koduki.data_dir / "users")
    response = koduki.http.get(target)
    assert response.status == status, response.text
    assert message in response.text
    assert files_under(koduki.data_dir / "users") - before == set()  # nothing new anywhere
    assert koduki.http.get("/koduki/show").text == "koduki's account is 100 yen.\n"


@pytest.mark.parametrize("target", ["//create", "//show", "/nope", "/", "/koduki/explode"])
def test_empty_names_and_unknown_paths_are_refused(koduki: RunningStack, target: str) -> None:
    response = koduki.http.get(target)
    assert response.status in (400, 404), (target, response.status, response.text)


def test_withdraw_beyond_the_balance(koduki: RunningStack) -> None:
    response = koduki.http.post("/v1/accounts/koduki:withdraw", {"amount": 101})
    assert response.status == 400, response.text
    assert "insufficient" in response.json()["message"]
    assert koduki.http.get("/koduki/show").text == "koduki's account is 100 yen.\n"


def test_json_amounts_are_checked(koduki: RunningStack) -> None:
    for amount, status in [(0, 400), (-3, 400), ("x", 400), (str(INT64_MAX), 400)]:
        response = koduki.http.post("/v1/accounts/koduki:deposit", {"amount": amount})
        assert response.status == status, (amount, response.text)


def test_files_stay_in_the_users_own_directory(koduki: RunningStack) -> None:
    users = koduki.data_dir / "users"
    own = user_dir(koduki.data_dir, "koduki")
    assert all(own in p.parents for p in files_under(users))
