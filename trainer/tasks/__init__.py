"""Built-in tasks (trainer/task.py has the contract they follow)."""
