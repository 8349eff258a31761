"""Evaluation recipes: methods side by side on the same examples (:mod:`.harness`), the method x task x budget
grid (:mod:`.compare`), and tables and plots made from result rows (:mod:`.report`)."""
