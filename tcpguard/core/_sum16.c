/* The one's-complement word sum behind every TCP and IPv4 checksum tcpguard verifies, in C.
 *
 * Why by hand: every packet through the gateway is checksummed before the rules may see it (a segment
 * the receiver drops for a bad checksum must not reach them: insertion). In Python the sum is a big
 * integer and a `%`, or zlib byte sums for long segments: a quarter of the compiled engine's time per
 * packet on the benchmark's request/response traffic (perf, docs/BENCHMARKS.md round 4). This loop does
 * it in a few hundred nanoseconds at most. tcpguard/core/packet.py keeps the Python version: it runs
 * when this module was not built (no C compiler, TCPGUARD_PURE=1), and the tests hold the two equal.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* sum16_mod(data, start, end) -> int
 *
 * data[start:end] read as big-endian 16-bit words (an odd last byte padded with zero), summed modulo
 * 0xFFFF: the same value as tcpguard.core.packet.sum16_mod_py. start and end are clamped to the buffer
 * like a slice's (negative values are not accepted). */
static PyObject *
sum16_mod(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "sum16_mod(data, start, end)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    /* Bounds past Py_ssize_t clamp (NULL: no OverflowError), like a slice's. */
    Py_ssize_t start = PyNumber_AsSsize_t(args[1], NULL);
    if (start == -1 && PyErr_Occurred())
        goto fail;
    Py_ssize_t end = PyNumber_AsSsize_t(args[2], NULL);
    if (end == -1 && PyErr_Occurred())
        goto fail;
    if (start < 0 || end < 0) {
        PyErr_SetString(PyExc_ValueError, "start and end must not be negative");
        goto fail;
    }
    if (end > view.len)
        end = view.len;
    if (start >= end) { /* an empty range; also keeps `i + 1` below from overflowing */
        PyBuffer_Release(&view);
        return PyLong_FromLong(0);
    }
    const unsigned char *p = (const unsigned char *)view.buf;
    uint64_t acc = 0; /* 2**48 words before it could overflow: far beyond any buffer */
    Py_ssize_t i = start;
    for (; i + 1 < end; i += 2)
        acc += ((uint32_t)p[i] << 8) | p[i + 1];
    if (i < end)
        acc += (uint32_t)p[i] << 8;
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(acc % 0xFFFF);
fail:
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef methods[] = {
    {"sum16_mod", (PyCFunction)(void (*)(void))sum16_mod, METH_FASTCALL,
     "sum16_mod(data, start, end): data[start:end] as big-endian 16-bit words, summed modulo 0xFFFF."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tcpguard.core._sum16", "The checksum word sum in C (see the source).", 0, methods,
};

PyMODINIT_FUNC
PyInit__sum16(void)
{
    return PyModule_Create(&module);
}
