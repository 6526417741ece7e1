"""The dsv3_ref book (jupyter-book 1.x): pages in this folder, notebooks from notebooks/; build with `make book`."""
