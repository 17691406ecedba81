"""The original plain-text answers, byte for byte (DESIGN.md: "The original plain-text routes").
The dispatcher's TextGateway and the one-shot worker of the benchmark baseline both answer with
these, so the two can never drift apart."""

from __future__ import annotations


def welcome(user: str) -> str:
    return f"Hello, {user}. Welcome Unlimited Process Works!\n"


def deposited(user: str, amount: int) -> str:
    return f"{user}'s account deposit {amount} yen.\n"


def balance(user: str, amount: int) -> str:
    return f"{user}'s account is {amount} yen.\n"


def summary_line(user: str, balance: int) -> str:
    """One line of `GET /account_summary`. PostgreSQL builds the whole body with the same
    format (`etl.sink._SUMMARY_TEXT`); a test holds the two together."""
    return f"{user}, {balance}\n"
