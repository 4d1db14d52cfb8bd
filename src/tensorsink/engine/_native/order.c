/* Latest write wins: reserve() numbers each path in the order of write() calls, and a file is renamed
 * only if no later number for its path was renamed already. The numbers live in STRIPES tables, each
 * under its own lock, by the path's hash. */
#include "engine.h"

size_t stripe_of(const char *path, uint64_t *h) {
    *h = hash_of(path);
    return (size_t)(*h % STRIPES);
}

/* Number `path` (the next number, in call order: with the GIL, so calls do not overlap): 0, or -1 when
 * there is no memory for its slot (the number is taken all the same, and not reserved). */
int reserve_order(Engine *e, const char *path, int64_t *number) {
    uint64_t h;
    size_t stripe = stripe_of(path, &h);
    pthread_mutex_lock(&e->order_locks[stripe]);
    Slot *s = table_find(&e->order[stripe], path, h, 1);
    *number = ++e->counter;
    if (s && s->a++ == 0) s->b = -1;
    pthread_mutex_unlock(&e->order_locks[stripe]);
    return s ? 0 : -1;
}

void release_order(Engine *e, const char *path) {
    uint64_t h;
    size_t stripe = stripe_of(path, &h);
    pthread_mutex_lock(&e->order_locks[stripe]);
    Slot *s = table_find(&e->order[stripe], path, h, 0);
    if (s && --s->a == 0) table_remove(&e->order[stripe], s, h);
    pthread_mutex_unlock(&e->order_locks[stripe]);
}
