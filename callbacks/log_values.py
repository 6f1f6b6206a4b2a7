from __future__ import annotations


def add_to_log(state, logs: dict, values: dict) -> None:
    """Add values to the log line being reported and to its copy in the Trainer's log history (which the
    Trainer appended just before calling on_log), so trackers, the console and trainer_state.json agree."""
    logs.update(values)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(values)
