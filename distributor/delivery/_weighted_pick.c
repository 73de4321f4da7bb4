/*
 * Routing's per-packet arithmetic in C: the analyzer furthest behind its share.
 *
 * Why: routing.Router.choose runs for every packet; in Python reading four shared counters and
 * scoring four analyzers costs about a microsecond (5 % of a worker's CPU per packet), here a
 * tenth of that. The formula is routing.best_index's (the reference, used when this module is
 * not built); tests/delivery/test_weighted_pick.py checks that both give the same index.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

PyDoc_STRVAR(best_doc,
"best(counters, cells, offsets, weights, messages) -> int\n\n"
"Index i maximising weights[i] * (T + messages) - R[i] (the first of equals), where\n"
"R[i] = counters[cells[i]] + offsets[i] and T = sum(R); -1 when there is no candidate.\n"
"counters: an int64 buffer (the shared table); cells, offsets: lists of int; weights: a list of float\n"
"(exactly those types: anything else is a TypeError).");

static PyObject *best(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "best() takes counters, cells, offsets, weights and messages");
        return NULL;
    }
    PyObject *cells = args[1], *offsets = args[2], *weights = args[3];
    if (!PyList_CheckExact(cells) || !PyList_CheckExact(offsets) || !PyList_CheckExact(weights)) {
        PyErr_SetString(PyExc_TypeError, "cells, offsets and weights must be lists");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(cells);
    if (PyList_GET_SIZE(offsets) != n || PyList_GET_SIZE(weights) != n) {
        PyErr_SetString(PyExc_ValueError, "cells, offsets and weights must have the same length");
        return NULL;
    }
    /* exact ints and floats only: their conversion runs no Python code that could change the lists */
    if (!PyLong_CheckExact(args[4])) {
        PyErr_SetString(PyExc_TypeError, "messages must be an int");
        return NULL;
    }
    long long messages = PyLong_AsLongLong(args[4]);
    if (messages == -1 && PyErr_Occurred()) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyLong_CheckExact(PyList_GET_ITEM(cells, i)) || !PyLong_CheckExact(PyList_GET_ITEM(offsets, i))
                || !PyFloat_CheckExact(PyList_GET_ITEM(weights, i))) {
            PyErr_SetString(PyExc_TypeError, "cells and offsets must hold ints, weights floats");
            return NULL;
        }
    }
    if (n == 0) return PyLong_FromLong(-1);
    if (n > 1024) {
        PyErr_SetString(PyExc_ValueError, "at most 1024 candidates");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    if (view.itemsize != 8 || view.format == NULL || (view.format[0] != 'q' && view.format[0] != 'l')
            || view.format[1] != '\0') {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "counters must be a buffer of int64 ('q')");
        return NULL;
    }
    const int64_t *counters = (const int64_t *)view.buf;
    Py_ssize_t count = view.len / 8;
    double routed[1024];
    long long sum = messages;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t cell = PyLong_AsSsize_t(PyList_GET_ITEM(cells, i));
        long long offset = PyLong_AsLongLong(PyList_GET_ITEM(offsets, i));
        if (PyErr_Occurred()) {
            PyBuffer_Release(&view);
            return NULL;
        }
        if (cell < 0 || cell >= count) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_IndexError, "counter cell out of range");
            return NULL;
        }
        /* as Python computes it: an exact integer sum, then one conversion to float */
        long long value;
        if (__builtin_add_overflow((long long)counters[cell], offset, &value) ||
                __builtin_add_overflow(sum, value, &sum)) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_OverflowError, "routed totals beyond 64 bits");
            return NULL;
        }
        routed[i] = (double)value;
    }
    PyBuffer_Release(&view);
    double total = (double)sum;
    Py_ssize_t top = 0;
    double top_score = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        double weight = PyFloat_AS_DOUBLE(PyList_GET_ITEM(weights, i));
        double score = weight * total - routed[i];
        if (i == 0 || score > top_score) {
            top = i;
            top_score = score;
        }
    }
    return PyLong_FromSsize_t(top);
}

static PyMethodDef methods[] = {
    {"best", (PyCFunction)(void (*)(void))best, METH_FASTCALL, best_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_weighted_pick", "Routing's per-packet arithmetic (see routing.best_index).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__weighted_pick(void) {
    return PyModule_Create(&module);
}
