"""Teaching and checking: exercise checkers (`exercises`) and validation against shipped reference outputs
(`validate`)."""
