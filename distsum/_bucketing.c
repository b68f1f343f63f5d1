/* Histogram bucketing in one pass: the compiled form of _histogram.py's numpy bucketing.
 *
 * bucket(values, table, counts, sums) reads each value once and does everything
 * Histogram.from_values needs: the bucket (the same bit-pattern lookup as the numpy code, with
 * _histogram._index_table's table), the counts of NaN and infinities, which it leaves out,
 * min/max of the finite values and, if sums, their float64 sum and sum of squares. The numpy
 * code takes ten passes and a dozen calls into numpy for the same; on a machine whose caches
 * are cold whenever a background thread wakes up, each call costs more than the values do.
 * The interpreter lock is released for the loop, so the training thread runs meanwhile.
 *
 * Only Python's C API is used (the buffer protocol, no numpy headers), so building needs
 * nothing but a C compiler; without one, the numpy code is used instead.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define NUM_BUCKETS 1551
/* A value's tally index is its bucket if positive, NEGATIVE - bucket if its sign bit is set. */
#define NEGATIVE (2 * NUM_BUCKETS)
#define NUM_KEYS 65536

typedef struct {
    double low, high, sum, sum_squares;
    Py_ssize_t nan, posinf, neginf;
    int out_of_range; /* a tally index past the tally: a wrong table */
} Result;

/* One loop per width; PATTERN is the unsigned type of the value's bits. */
#define BUCKET_LOOP(NAME, FLOAT, PATTERN, SHIFT, EXPONENT, MANTISSA)                               \
    static void NAME(const FLOAT *values, Py_ssize_t n, const PATTERN *table, int sums,            \
                     int64_t *tally, Result *r)                                                    \
    {                                                                                              \
        const PATTERN *bits = (const PATTERN *)values;                                             \
        FLOAT low = (FLOAT)Py_HUGE_VAL, high = -(FLOAT)Py_HUGE_VAL;                                \
        double sum = 0.0, sum_squares = 0.0;                                                       \
        for (Py_ssize_t i = 0; i < n; i++) {                                                       \
            PATTERN p = bits[i];                                                                   \
            if ((p & EXPONENT) == EXPONENT) {                                                      \
                if (p & MANTISSA)                                                                  \
                    r->nan++;                                                                      \
                else if (p >> (SHIFT + 15))                                                        \
                    r->neginf++;                                                                   \
                else                                                                               \
                    r->posinf++;                                                                   \
                continue;                                                                          \
            }                                                                                      \
            FLOAT v = values[i];                                                                   \
            low = v < low ? v : low;                                                               \
            high = v > high ? v : high;                                                            \
            if (sums) {                                                                            \
                double w = (double)v;                                                              \
                sum += w;                                                                          \
                sum_squares += w * w;                                                              \
            }                                                                                      \
            /* The carry of this addition does the comparison with the boundary inside the         \
             * value's cell (see _index_table). */                                                 \
            size_t t = (size_t)((PATTERN)(p + table[p >> SHIFT]) >> SHIFT);                        \
            if (t >= NEGATIVE) {                                                                   \
                r->out_of_range = 1;                                                               \
                return;                                                                            \
            }                                                                                      \
            tally[t]++;                                                                            \
        }                                                                                          \
        r->low = (double)low;                                                                      \
        r->high = (double)high;                                                                    \
        r->sum = sum;                                                                              \
        r->sum_squares = sum_squares;                                                              \
    }

BUCKET_LOOP(bucket_float32, float, uint32_t, 16, 0x7f800000u, 0x007fffffu)
BUCKET_LOOP(bucket_float64, double, uint64_t, 48, 0x7ff0000000000000u, 0x000fffffffffffffu)

static int
get_buffer(PyObject *object, Py_buffer *view, int flags, Py_ssize_t itemsize, Py_ssize_t length,
           const char *name)
{
    if (PyObject_GetBuffer(object, view, flags | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->itemsize != itemsize || (length >= 0 && view->len != length * itemsize)) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items of %zd bytes, got %zd bytes of %zd",
                     name, length, itemsize, view->len, view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(bucket_doc,
"bucket(values, table, counts, sums) -> (min, max, nan, posinf, neginf, sum, sum_squares)\n\n"
"Adds the bucket counts of ``values`` (a contiguous float32 or float64 buffer) to ``counts``\n"
"(int64, one per bucket), using ``table``, _histogram's index table for the values' type.\n"
"NaN and infinities are only counted. min/max are +inf/-inf and the sums 0.0 without a\n"
"finite value; the sums are 0.0 too unless ``sums`` is true.");

static PyObject *
bucket(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "bucket() takes 4 arguments, got %zd", nargs);
        return NULL;
    }
    int sums = PyObject_IsTrue(args[3]);
    if (sums < 0)
        return NULL;
    Py_buffer values, table, counts;
    if (PyObject_GetBuffer(args[0], &values, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    /* Native byte order only: numpy writes no prefix for it. */
    const char *format = values.format;
    if (format[0] == '=' || format[0] == '@')
        format++;
    int wide = strcmp(format, "d") == 0;
    if (!wide && strcmp(format, "f") != 0) {
        PyErr_Format(PyExc_TypeError, "values: expected float32 or float64, got format %s",
                     values.format);
        PyBuffer_Release(&values);
        return NULL;
    }
    if (get_buffer(args[1], &table, PyBUF_SIMPLE, values.itemsize, NUM_KEYS, "table") < 0) {
        PyBuffer_Release(&values);
        return NULL;
    }
    if (get_buffer(args[2], &counts, PyBUF_WRITABLE, 8, NUM_BUCKETS, "counts") < 0) {
        PyBuffer_Release(&table);
        PyBuffer_Release(&values);
        return NULL;
    }
    Result r = {0};
    /* 25 KB: on the stack, where a heap block would be page-faulted in fresh at times. */
    int64_t tally[NEGATIVE] = {0};
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t n = values.len / values.itemsize;
    if (wide)
        bucket_float64(values.buf, n, table.buf, sums, tally, &r);
    else
        bucket_float32(values.buf, n, table.buf, sums, tally, &r);
    if (!r.out_of_range) {
        int64_t *out = counts.buf;
        for (int k = 0; k < NUM_BUCKETS; k++)
            out[k] += tally[k];
        /* The negative values' tally indices, NEGATIVE - bucket, folded onto their buckets. */
        for (int k = 1; k < NUM_BUCKETS; k++)
            out[k] += tally[NEGATIVE - k];
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&counts);
    PyBuffer_Release(&table);
    PyBuffer_Release(&values);
    if (r.out_of_range) {
        PyErr_SetString(PyExc_ValueError, "table gives a tally index past the tally");
        return NULL;
    }
    return Py_BuildValue("ddnnndd", r.low, r.high, r.nan, r.posinf, r.neginf, r.sum,
                         r.sum_squares);
}

static PyMethodDef methods[] = {
    {"bucket", (PyCFunction)(void (*)(void))bucket, METH_FASTCALL, bucket_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "distsum._bucketing",
    .m_doc = "Histogram bucketing in one pass over the values (see _histogram.py).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__bucketing(void)
{
    return PyModuleDef_Init(&module);
}
