/* Field lines of an HTTP/1.1 head in their common shape, tokenised in one call.
 *
 * plain_fields(head) -> (items, special) | None
 *
 * `head` is a whole head: a first line (request or status line, checked by the caller), field
 * lines, and the empty line. When every field line is plain -- a token name, a colon, optional
 * SP/HTAB, a value of HTAB, visible ASCII or obs-text bytes, optional SP/HTAB, CRLF -- returns
 * the fields as h11 keeps them, `items` = [(raw name, lowercase name, value without surrounding
 * SP/HTAB)], and `special` = the indexes of the fields the codecs look at (Host, Content-Length,
 * Transfer-Encoding, Connection, Expect, Upgrade). Otherwise (folded lines, bare CR or LF,
 * whitespace before a colon, other bytes) returns None and the caller's other parsers decide.
 *
 * This is h11's field grammar narrowed (h11 also takes most control bytes in values), so a head
 * accepted here reads exactly as h11 reads it; tests/test_h1_differential.py and
 * tests/test_h1_client_differential.py hold the codecs using it to h11's verdicts.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* RFC 9110 tchar */
static unsigned char is_tchar[256];
/* HTAB, SP..~, obs-text: what a plain value may hold */
static unsigned char is_value[256];

static void init_tables(void)
{
    const char *extra = "!#$%&'*+-.^_`|~";
    for (int c = '0'; c <= '9'; c++) is_tchar[c] = 1;
    for (int c = 'a'; c <= 'z'; c++) is_tchar[c] = 1;
    for (int c = 'A'; c <= 'Z'; c++) is_tchar[c] = 1;
    for (const char *p = extra; *p; p++) is_tchar[(unsigned char)*p] = 1;
    is_value['\t'] = 1;
    for (int c = 0x20; c <= 0x7e; c++) is_value[c] = 1;
    for (int c = 0x80; c <= 0xff; c++) is_value[c] = 1;
}

static const char *const SPECIAL[] = {
    "host", "content-length", "transfer-encoding", "connection", "expect", "upgrade", NULL,
};

static int is_special(const char *name, Py_ssize_t n)
{
    for (int i = 0; SPECIAL[i]; i++) {
        if ((Py_ssize_t)strlen(SPECIAL[i]) == n && memcmp(SPECIAL[i], name, (size_t)n) == 0)
            return 1;
    }
    return 0;
}

static PyObject *plain_fields(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "plain_fields() takes bytes");
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t len = PyBytes_GET_SIZE(arg);
    if (len < 4 || memcmp(buf + len - 4, "\r\n\r\n", 4) != 0)
        Py_RETURN_NONE;
    const unsigned char *first_end = memchr(buf, '\n', (size_t)len);
    if (first_end == NULL || first_end == buf || first_end[-1] != '\r')
        Py_RETURN_NONE;
    Py_ssize_t pos = (first_end - buf) + 1;  /* start of the first field line */
    Py_ssize_t end = len - 2;                /* the empty line's CRLF starts here */

    PyObject *items = PyList_New(0);
    PyObject *special = PyList_New(0);
    if (items == NULL || special == NULL)
        goto fail;
    char lower[256];
    while (pos < end) {
        /* name: tchar+ up to the colon */
        Py_ssize_t name_start = pos;
        int has_upper = 0;
        while (pos < end && is_tchar[buf[pos]]) {
            if (buf[pos] >= 'A' && buf[pos] <= 'Z')
                has_upper = 1;
            pos++;
        }
        Py_ssize_t name_len = pos - name_start;
        if (name_len == 0 || pos >= end || buf[pos] != ':')
            goto not_plain;
        pos++;
        /* value: every byte up to the line's CRLF must be a value byte */
        Py_ssize_t value_start = pos;
        while (pos < end && is_value[buf[pos]])
            pos++;
        if (pos >= end || buf[pos] != '\r' || buf[pos + 1] != '\n')
            goto not_plain;
        Py_ssize_t value_end = pos;
        pos += 2;
        while (value_start < value_end && (buf[value_start] == ' ' || buf[value_start] == '\t'))
            value_start++;
        while (value_end > value_start && (buf[value_end - 1] == ' ' || buf[value_end - 1] == '\t'))
            value_end--;

        PyObject *raw = PyBytes_FromStringAndSize((const char *)buf + name_start, name_len);
        if (raw == NULL)
            goto fail;
        PyObject *name;
        const char *lname = (const char *)buf + name_start;
        if (has_upper) {
            char *heap = NULL;
            char *dst = lower;
            if (name_len > (Py_ssize_t)sizeof(lower)) {
                heap = PyMem_Malloc((size_t)name_len);
                if (heap == NULL) {
                    Py_DECREF(raw);
                    PyErr_NoMemory();
                    goto fail;
                }
                dst = heap;
            }
            for (Py_ssize_t i = 0; i < name_len; i++) {
                unsigned char c = buf[name_start + i];
                dst[i] = (char)((c >= 'A' && c <= 'Z') ? c + 32 : c);
            }
            name = PyBytes_FromStringAndSize(dst, name_len);
            if (name != NULL && is_special(dst, name_len)) {
                PyObject *idx = PyLong_FromSsize_t(PyList_GET_SIZE(items));
                if (idx == NULL || PyList_Append(special, idx) < 0) {
                    Py_XDECREF(idx);
                    Py_DECREF(name);
                    Py_DECREF(raw);
                    PyMem_Free(heap);
                    goto fail;
                }
                Py_DECREF(idx);
            }
            PyMem_Free(heap);
        } else {
            name = raw;
            Py_INCREF(name);
            if (is_special(lname, name_len)) {
                PyObject *idx = PyLong_FromSsize_t(PyList_GET_SIZE(items));
                if (idx == NULL || PyList_Append(special, idx) < 0) {
                    Py_XDECREF(idx);
                    Py_DECREF(name);
                    Py_DECREF(raw);
                    goto fail;
                }
                Py_DECREF(idx);
            }
        }
        if (name == NULL) {
            Py_DECREF(raw);
            goto fail;
        }
        PyObject *value = PyBytes_FromStringAndSize((const char *)buf + value_start, value_end - value_start);
        if (value == NULL) {
            Py_DECREF(name);
            Py_DECREF(raw);
            goto fail;
        }
        PyObject *item = PyTuple_Pack(3, raw, name, value);
        Py_DECREF(raw);
        Py_DECREF(name);
        Py_DECREF(value);
        if (item == NULL)
            goto fail;
        int rc = PyList_Append(items, item);
        Py_DECREF(item);
        if (rc < 0)
            goto fail;
    }
    PyObject *out = PyTuple_Pack(2, items, special);
    Py_DECREF(items);
    Py_DECREF(special);
    return out;

not_plain:
    Py_DECREF(items);
    Py_DECREF(special);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(items);
    Py_XDECREF(special);
    return NULL;
}

static PyMethodDef methods[] = {
    {"plain_fields", plain_fields, METH_O,
     "plain_fields(head) -> (items, special) | None: the field lines of a whole head in their "
     "common shape, as h11 keeps them; None when any line is not plain."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "edgeproxy.http._fields",
    "Plain HTTP/1.1 field lines tokenised in one call (see plain_fields).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fields(void)
{
    init_tables();
    return PyModule_Create(&module);
}
