"""Guard against Qt bindings that drain the reference count of None (PySide6 6.12.0 does: every
void call such as QTableWidget.setRowCount takes one reference, and a long session ends in
"Fatal Python error: none_dealloc")."""

import gc
import sys


def test_qt_calls_keep_none_alive(qtbot):
    from qtpy.QtWidgets import QTableWidget

    table = QTableWidget(4, 4)
    qtbot.addWidget(table)
    gc.collect()
    before = sys.getrefcount(None)
    for _ in range(1000):
        table.setRowCount(3)
        table.clearContents()
    gc.collect()
    assert sys.getrefcount(None) - before > -100
