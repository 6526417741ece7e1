"""Teaching and checking: exercise checkers (`exercises`), the notebook-end answer checks (`answers`), the notebooks'
drawing helpers (`plots`) and validation against shipped reference outputs (`validate`)."""
