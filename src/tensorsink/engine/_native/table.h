/* A small string-keyed table, for per-path and per-folder state. Plain C: no locking of its own (each
 * user holds its lock around it) and nothing of Python's. */
#ifndef TENSORSINK_TABLE_H
#define TENSORSINK_TABLE_H

#include <stddef.h>
#include <stdint.h>

typedef struct Slot {
    struct Slot *next;
    char *key;
    int64_t a, b, c; /* meaning depends on the table */
    int running;
} Slot;

typedef struct {
    Slot **buckets;
    size_t nbuckets, count;
} Table;

#pragma GCC visibility push(hidden) /* shared by the extension's files, not exported from it */

uint64_t hash_of(const char *s);
int table_init(Table *t, size_t nbuckets);
/* The key's slot, made (zeroed) if `create` and absent; NULL if absent, or out of memory. */
Slot *table_find(Table *t, const char *key, uint64_t h, int create);
void table_remove(Table *t, Slot *slot, uint64_t h);
void table_free(Table *t);

#pragma GCC visibility pop

#endif
