/*
 * daemon.usage._fdscan: the hot loop of daemon/usage/fdscan.py in C.
 *
 * scan(pids, targets) -> list of (pid, target index)
 *
 * For every pid, lists /proc/<pid>/fd and stats each entry (the magic link
 * follows to the open file, deleted or in another mount namespace), and
 * reports each (pid, i) where the fd's (st_dev, st_ino) equals targets[i].
 * Each pair appears at most once. The GIL is released for the whole walk,
 * so two Python threads calling scan() on halves of the pid list run on two
 * cores. A process or fd that vanishes or refuses access mid-walk is skipped,
 * exactly like the pure Python version.
 *
 * Must never: open, read or follow the target files themselves (fstatat on
 * the magic link only), allocate per fd, or hold the GIL while in a syscall.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    uint64_t ino;
    uint64_t dev;
    Py_ssize_t index;
} target_t;

typedef struct {
    long pid;
    Py_ssize_t index;
} hit_t;

typedef struct {
    hit_t *items;
    size_t len;
    size_t cap;
    int oom;
} hits_t;

static int cmp_target(const void *a, const void *b) {
    const target_t *x = a, *y = b;
    if (x->ino != y->ino) return x->ino < y->ino ? -1 : 1;
    if (x->dev != y->dev) return x->dev < y->dev ? -1 : 1;
    return 0;
}

static void add_hit(hits_t *hits, long pid, Py_ssize_t index) {
    /* One pid holding the same file on several fds reports it once. */
    for (size_t k = hits->len; k > 0 && hits->items[k - 1].pid == pid; k--)
        if (hits->items[k - 1].index == index) return;
    if (hits->len == hits->cap) {
        size_t cap = hits->cap ? hits->cap * 2 : 64;
        hit_t *grown = realloc(hits->items, cap * sizeof(hit_t));
        if (grown == NULL) {
            hits->oom = 1;
            return;
        }
        hits->items = grown;
        hits->cap = cap;
    }
    hits->items[hits->len].pid = pid;
    hits->items[hits->len].index = index;
    hits->len++;
}

/* Targets are sorted by (ino, dev); several may share an ino on other devices. */
static void match(const target_t *targets, size_t n, uint64_t ino, uint64_t dev, long pid, hits_t *hits) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (targets[mid].ino < ino) lo = mid + 1;
        else hi = mid;
    }
    for (; lo < n && targets[lo].ino == ino; lo++)
        if (targets[lo].dev == dev) add_hit(hits, pid, targets[lo].index);
}

static void scan_pid(long pid, const target_t *targets, size_t n, hits_t *hits) {
    char path[48];
    snprintf(path, sizeof path, "/proc/%ld/fd", pid);
    int dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return; /* gone, or another user's process without privilege */
    DIR *dir = fdopendir(dfd);
    if (dir == NULL) {
        close(dfd);
        return;
    }
    struct dirent *entry;
    struct stat st;
    while ((entry = readdir(dir)) != NULL) {
        if (entry->d_name[0] == '.') continue;
        if (fstatat(dfd, entry->d_name, &st, 0) != 0) continue; /* closed meanwhile, or hidden */
        match(targets, n, (uint64_t)st.st_ino, (uint64_t)st.st_dev, pid, hits);
    }
    closedir(dir);
}

static PyObject *fdscan_scan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *pids_arg, *targets_arg;
    if (!PyArg_ParseTuple(args, "OO:scan", &pids_arg, &targets_arg)) return NULL;
    PyObject *pids_seq = PySequence_Fast(pids_arg, "pids must be a sequence of ints");
    if (pids_seq == NULL) return NULL;
    PyObject *targets_seq = PySequence_Fast(targets_arg, "targets must be a sequence of (dev, ino)");
    if (targets_seq == NULL) {
        Py_DECREF(pids_seq);
        return NULL;
    }
    Py_ssize_t npids = PySequence_Fast_GET_SIZE(pids_seq);
    Py_ssize_t ntargets = PySequence_Fast_GET_SIZE(targets_seq);
    long *pids = PyMem_Malloc((size_t)(npids ? npids : 1) * sizeof(long));
    target_t *targets = PyMem_Malloc((size_t)(ntargets ? ntargets : 1) * sizeof(target_t));
    PyObject *result = NULL;
    hits_t hits = {NULL, 0, 0, 0};
    if (pids == NULL || targets == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < npids; i++) {
        pids[i] = PyLong_AsLong(PySequence_Fast_GET_ITEM(pids_seq, i));
        if (pids[i] == -1 && PyErr_Occurred()) goto done;
    }
    for (Py_ssize_t i = 0; i < ntargets; i++) {
        unsigned long long dev, ino;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(targets_seq, i), "KK:target", &dev, &ino)) goto done;
        targets[i].dev = dev;
        targets[i].ino = ino;
        targets[i].index = i;
    }
    qsort(targets, (size_t)ntargets, sizeof(target_t), cmp_target);

    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < npids && !hits.oom; i++)
        if (pids[i] > 0) scan_pid(pids[i], targets, (size_t)ntargets, &hits);
    Py_END_ALLOW_THREADS

    if (hits.oom) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyList_New((Py_ssize_t)hits.len);
    if (result == NULL) goto done;
    for (size_t k = 0; k < hits.len; k++) {
        PyObject *pair = Py_BuildValue("(ln)", hits.items[k].pid, hits.items[k].index);
        if (pair == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, (Py_ssize_t)k, pair);
    }
done:
    free(hits.items);
    PyMem_Free(pids);
    PyMem_Free(targets);
    Py_DECREF(pids_seq);
    Py_DECREF(targets_seq);
    return result;
}

static PyMethodDef fdscan_methods[] = {
    {"scan", fdscan_scan, METH_VARARGS,
     "scan(pids, targets) -> [(pid, index)]: which pids hold an fd on targets[index] = (st_dev, st_ino)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fdscan_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "daemon.usage._fdscan",
    .m_doc = "The /proc fd walk of daemon.usage.fdscan, in C.",
    .m_size = -1,
    .m_methods = fdscan_methods,
};

PyMODINIT_FUNC PyInit__fdscan(void) { return PyModule_Create(&fdscan_module); }
