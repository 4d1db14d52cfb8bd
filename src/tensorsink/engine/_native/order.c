/* Latest write wins: reserve() numbers each path in the order of write() calls, and a file is renamed
 * only if no later number for its path was renamed already. The numbers live in STRIPES tables, each
 * under its own lock, by the path's hash. */
#include "engine.h"

size_t stripe_of(const char *path, uint64_t *h) {
    *h = hash_of(path);
    return (size_t)(*h % STRIPES);
}

void release_order(Engine *e, const char *path) {
    uint64_t h;
    size_t stripe = stripe_of(path, &h);
    pthread_mutex_lock(&e->order_locks[stripe]);
    Slot *s = table_find(&e->order[stripe], path, h, 0);
    if (s && --s->a == 0) table_remove(&e->order[stripe], s, h);
    pthread_mutex_unlock(&e->order_locks[stripe]);
}
