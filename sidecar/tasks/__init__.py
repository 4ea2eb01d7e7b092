"""Tasks: the declared intent an agent works under, and a bounded summary of its calls."""

from .store import CallRecord, MemoryTaskStore, Task, TaskStore, TaskSummary

__all__ = ["CallRecord", "MemoryTaskStore", "Task", "TaskStore", "TaskSummary"]
