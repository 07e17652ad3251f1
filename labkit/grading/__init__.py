"""Graders: `check` a learner's code against labkit's references and explain what is wrong."""

from labkit.grading.catalogue import exercises
from labkit.grading.check import check
from labkit.grading.exercise import Case, Exercise, Mistake, hidden, register, registry
from labkit.grading.helping import Hint, hint, is_fallback, use
from labkit.grading.report import CaseResult, Report

__all__ = ["Case", "CaseResult", "Exercise", "Hint", "Mistake", "Report", "check", "exercises", "hidden", "hint",
           "is_fallback", "register", "registry", "use"]
