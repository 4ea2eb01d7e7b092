"""Tasks: the declared intent an agent works under, a bounded summary of its calls, and its credentials."""

from .store import CallRecord, CredentialState, MemoryTaskStore, Task, TaskStore, TaskSummary

__all__ = ["CallRecord", "CredentialState", "MemoryTaskStore", "Task", "TaskStore", "TaskSummary"]
