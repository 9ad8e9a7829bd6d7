"""One loaded generation of a plugin, and the error that stops building one."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from kernel.runtime import PluginRuntime

from .context import LoadedContext
from .events import LoadStage
from .importer import ImportedPlugin
from .manifest import Manifest

__all__ = ["Generation", "StageError"]


class StageError(Exception):
    """Building a generation failed at ``stage``; ``error`` says why, naming the culprit."""

    def __init__(
        self,
        stage: LoadStage,
        error: str,
        *,
        exc: BaseException | None = None,
        generation: int | None = None,
        file: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(error)
        self.stage: LoadStage = stage
        self.error = error
        self.generation = generation
        #: The plugin file (relative to its folder) and line at fault, when known.
        self.file = file
        self.line = line
        self.traceback = "".join(traceback.format_exception(exc)) if exc is not None else ""


@dataclass(eq=False)
class Generation:
    """Everything one generation of a plugin owns while it is loaded."""

    name: str
    generation: int
    folder: Path
    manifest: Manifest
    digest: str
    imported: ImportedPlugin
    context: LoadedContext
    runtime: PluginRuntime
    #: This generation's entries of sys.modules (to tell whether they are still current).
    modules: dict[str, ModuleType] = field(default_factory=dict)
    #: The entries of sys.modules this generation replaced, until it is committed (then
    #: emptied, so an old generation's modules are not kept alive by the new one).
    previous: dict[str, ModuleType] = field(default_factory=dict)
    #: When building started (perf_counter), for ``duration_ms``.
    started: float = 0.0
    #: Whether ``PluginLoaded`` was recorded for it (its routes were offered to the router).
    announced: bool = False

    @property
    def prefix(self) -> str | None:
        return self.imported.prefix
