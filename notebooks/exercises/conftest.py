"""pytest (nbval) configuration for the exercise notebooks.

`01_student.ipynb` keeps its exercise stubs empty (`raise NotImplementedError`); under the notebook tests it must run
green, so DSV3_SOLUTIONS=1 asks it to plug in the functions of `02_solutions.ipynb` instead (see
`dsv3_ref.teaching.exercises.load_solutions`). The variable is set here, before nbval starts the kernels, which inherit it;
`make run` sets it too, so that the stored outputs are the ones these tests expect.
"""

import os

os.environ.setdefault("DSV3_SOLUTIONS", "1")
