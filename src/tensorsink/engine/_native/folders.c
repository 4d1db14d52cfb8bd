/* Folders: made below the root (mkdir -p, refusing symlinks unless allowed) and remembered, and fsynced
 * together after renames (FULL): one fsync covers every rename made before it began. */
#include "engine.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* mkdir -p below the root, refusing symlinks unless allowed; 0, or -1 with errno and *operation. */
int make_folders(Engine *e, const char *folder, const char **operation) {
    pthread_mutex_lock(&e->folder_lock);
    Slot *known = table_find(&e->folders, folder, hash_of(folder), 0);
    pthread_mutex_unlock(&e->folder_lock);
    if (known) return 0;
    size_t root_length = strlen(e->root);
    size_t length = strlen(folder);
    char *path = malloc(length + 1);
    if (!path) { errno = ENOMEM; *operation = "mkdir"; return -1; }
    memcpy(path, folder, length + 1);
    size_t position = root_length;
    if (strncmp(folder, e->root, root_length) != 0) position = 0;
    while (position < length) {
        size_t end = position + 1;
        while (end < length && path[end] != '/') end++;
        path[end] = '\0';
        struct stat st;
        if (lstat(path, &st) != 0) {
            if (errno != ENOENT) { *operation = "lstat"; goto error; }
            if (mkdir(path, 0777) != 0 && errno != EEXIST) { *operation = "mkdir"; goto error; }
            if (lstat(path, &st) != 0) { *operation = "lstat"; goto error; }
            if (e->durability == DURABILITY_FULL) {
                char *slash = strrchr(path, '/');
                if (slash && slash != path) {
                    *slash = '\0';
                    int rc = fsync_path(path);
                    *slash = '/';
                    if (rc != 0) { *operation = "fsync directory"; goto error; }
                }
            }
        }
        if (S_ISLNK(st.st_mode)) {
            if (!e->follow_symlinks) { errno = ELOOP; *operation = "symlink"; goto error; }
            if (stat(path, &st) != 0) { *operation = "stat"; goto error; }
        }
        if (!S_ISDIR(st.st_mode)) { errno = ENOTDIR; *operation = "mkdir"; goto error; }
        if (end < length) path[end] = '/';
        position = end;
    }
    free(path);
    pthread_mutex_lock(&e->folder_lock);
    Slot *slot = table_find(&e->folders, folder, hash_of(folder), 1);
    if (slot) slot->a = 1;
    pthread_mutex_unlock(&e->folder_lock);
    return 0;
error:;
    int saved = errno;
    free(path);
    errno = saved;
    return -1;
}

void forget_folder(Engine *e, const char *folder) {
    pthread_mutex_lock(&e->folder_lock);
    uint64_t h = hash_of(folder);
    Slot *slot = table_find(&e->folders, folder, h, 0);
    if (slot) table_remove(&e->folders, slot, h);
    pthread_mutex_unlock(&e->folder_lock);
}

/* One fsync covers every rename made before it began: wait for a running one, then lead the next. */
int sync_directory(Engine *e, const char *folder) {
    uint64_t h = hash_of(folder);
    pthread_mutex_lock(&e->sync_lock);
    Slot *s = table_find(&e->syncs, folder, h, 1);
    if (!s) { pthread_mutex_unlock(&e->sync_lock); errno = ENOMEM; return -1; }
    s->c++;
    int64_t ticket = ++s->a;
    while (s->running && s->b < ticket) pthread_cond_wait(&e->sync_cond, &e->sync_lock);
    int rc = 0, saved = 0;
    if (s->b < ticket) {
        s->running = 1;
        int64_t target = s->a;
        pthread_mutex_unlock(&e->sync_lock);
        rc = fsync_path(folder);
        saved = errno;
        pthread_mutex_lock(&e->sync_lock);
        s->running = 0;
        if (rc == 0) s->b = target;
        pthread_cond_broadcast(&e->sync_cond);
    }
    if (--s->c == 0) table_remove(&e->syncs, s, h);
    pthread_mutex_unlock(&e->sync_lock);
    errno = saved;
    return rc;
}
