"""The rotator role: schedule, workflow steps, and the retirement gate."""
