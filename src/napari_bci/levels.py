"""The HER2 levels, in order: the IHC scores 0, 1+, 2+ and 3+ of the ASCO/CAP 2018 guideline
(and the BCI dataset's file names). The one definition every module uses."""

HER2_LEVELS = ("0", "1+", "2+", "3+")
