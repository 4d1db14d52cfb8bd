/* A small string-keyed table (see table.h): chained buckets, FNV-1a hashes. */
#include "table.h"

#include <stdlib.h>
#include <string.h>

uint64_t hash_of(const char *s) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    while (*s) { h ^= (unsigned char)*s++; h *= 1099511628211ull; }
    return h;
}

int table_init(Table *t, size_t nbuckets) {
    t->buckets = calloc(nbuckets, sizeof(Slot *));
    t->nbuckets = nbuckets;
    t->count = 0;
    return t->buckets ? 0 : -1;
}

/* Buckets take other bits of the hash than the engine's stripes (h % STRIPES), or a stripe's table would
 * keep all its keys in one bucket. */
static size_t bucket_of(Table *t, uint64_t h) { return (size_t)((h >> 16) % t->nbuckets); }

/* Twice the buckets once there are twice as many keys, so that chains stay short (a stream of keys in
 * a new folder each, say); on no memory the table keeps its size. */
static void grow(Table *t) {
    size_t nbuckets = t->nbuckets * 2;
    Slot **buckets = calloc(nbuckets, sizeof(Slot *));
    if (!buckets) return;
    Table grown = {buckets, nbuckets, t->count};
    for (size_t i = 0; i < t->nbuckets; i++)
        for (Slot *s = t->buckets[i], *n; s; s = n) {
            n = s->next;
            Slot **head = &buckets[bucket_of(&grown, hash_of(s->key))];
            s->next = *head;
            *head = s;
        }
    free(t->buckets);
    *t = grown;
}

Slot *table_find(Table *t, const char *key, uint64_t h, int create) {
    Slot **head = &t->buckets[bucket_of(t, h)];
    for (Slot *s = *head; s; s = s->next)
        if (strcmp(s->key, key) == 0) return s;
    if (!create) return NULL;
    Slot *s = calloc(1, sizeof(Slot));
    if (!s) return NULL;
    s->key = strdup(key);
    if (!s->key) { free(s); return NULL; }
    s->next = *head;
    *head = s;
    if (++t->count > 2 * t->nbuckets) grow(t);
    return s;
}

void table_remove(Table *t, Slot *slot, uint64_t h) {
    for (Slot **p = &t->buckets[bucket_of(t, h)]; *p; p = &(*p)->next)
        if (*p == slot) { *p = slot->next; free(slot->key); free(slot); t->count--; return; }
}

void table_free(Table *t) {
    if (!t->buckets) return;
    for (size_t i = 0; i < t->nbuckets; i++)
        for (Slot *s = t->buckets[i], *n; s; s = n) { n = s->next; free(s->key); free(s); }
    free(t->buckets);
    t->buckets = NULL;
}
