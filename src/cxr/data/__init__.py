"""Data: what an X-ray data set is and how its images reach memory.

The `Sample` record and patient ids (`dataset`), samples from the folder layout or a CSV manifest
(`folders`, `manifest`), label sets (`labels`), decoding one file or many (`images`, `decode`), the
decoded-once uint8 cache (`cache`), loading a split (`loading`), copies found by content (`overlap`)
and fetching the public data set (`download`). The bottom layer: it imports only the package's top
modules (`config`, `errors`, `files`), and knows nothing of models, processes or ranks.
"""
