"""Session set-up shared by the tests: the pooled ranks stop when the session ends."""

from tests.dist import close_pools


def pytest_sessionfinish(session, exitstatus) -> None:
    close_pools()
