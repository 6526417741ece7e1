"""Course tooling around the notebooks (not part of the `dsv3_ref` package): the student edition
(`classroom.editions`), the lesson slides (`classroom.slides`) and the headless-browser checks of the built pages
(`classroom.browser`). The Makefile runs them: `make student`, `make slides`."""
