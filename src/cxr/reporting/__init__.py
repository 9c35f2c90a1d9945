"""Reporting: files in, figures and pages out.

CAM arrays (`cam`), the figures and CAM galleries of a run (`explain`, `plots`), the HTML/Markdown
report (`report` and its sections), the model card sentence (`card`) and TensorBoard/MLflow
(`tracking`). Reads what training and evaluation wrote; may import `evaluation` and below, never
adaptation, deploy or the commands.
"""
