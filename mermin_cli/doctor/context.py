"""What the checks share: the options, the loaded config, the interfaces, the flow program
and the running capture's local API."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mermin_cli.views.source import ApiClient, ApiUnavailable, default_url

if TYPE_CHECKING:
    from mermin_cli.config.schema import Config
    from mermin_cli.discovery.interfaces import Interface
    from mermin_cli.engine.program import FlowProgram

T = TypeVar("T")


@dataclass(frozen=True)
class Options:
    """What `mermin doctor` was asked to check."""

    config: Path | None = None
    interfaces: tuple[str, ...] = ()  # -i patterns; empty: the config's
    attach_mode: str = "auto"  # as `capture --attach`
    api_url: str | None = None  # a capture's API; None: from the config's internal "server"


class Context:
    """State shared by the checks of one run; set by the checks that establish it."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self._config: Config | None = None  # set by config.valid
        self.selected: list[Interface] = []  # set by config.patterns
        self._links: list[Interface] | None = None
        self.program: FlowProgram | None = None  # set by attach.program
        self._capture: dict[str, Any] | None = None
        self._capture_error: ApiUnavailable | None = None

    @property
    def config(self) -> Config:
        """The loaded configuration (checks that use it require config.valid)."""
        if self._config is None:
            raise RuntimeError("config.valid has not loaded the configuration")
        return self._config

    @config.setter
    def config(self, value: Config) -> None:
        self._config = value

    @property
    def links(self) -> list[Interface]:
        """Every interface of this network namespace."""
        if self._links is None:
            from mermin_cli.discovery.interfaces import list_interfaces

            self._links = list_interfaces()
        return self._links

    @property
    def api(self) -> ApiClient:
        """The running capture's API: --api, else the config's internal "server"."""
        url = self.options.api_url or default_url(self.config)
        if url is None:
            raise ApiUnavailable('The config disables the capture API (internal "server").')
        return ApiClient(url)

    def capture(self) -> dict[str, Any]:
        """The running capture's /api/v1/status (fetched once; ApiUnavailable when none)."""
        if self._capture is None:
            if self._capture_error is None:
                try:
                    return self.refresh_capture()
                except ApiUnavailable as exc:
                    self._capture_error = exc
            raise self._capture_error
        return self._capture

    def refresh_capture(self) -> dict[str, Any]:
        """Fetch the capture's status again; later checks see the new one."""
        self._capture = self.api.status()
        return self._capture

    def close(self) -> None:
        if self.program is not None:
            self.program.close()
            self.program = None


def within(seconds: float, work: Callable[[], T]) -> T:
    """``work()`` on a daemon thread; TimeoutError if it takes longer than ``seconds``.

    For calls without a timeout of their own (name resolution): a hung lookup never keeps
    doctor from finishing or exiting.
    """
    box: list[Any] = []

    def target() -> None:
        try:
            box.append((True, work()))
        except BaseException as exc:
            box.append((False, exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if not box:
        raise TimeoutError(f"no answer within {seconds:g}s")
    ok, value = box[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]
