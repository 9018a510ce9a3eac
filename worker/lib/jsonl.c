
/*
 * Copyright (C) nginx-meter authors
 */


#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "jsonl.h"
#include "log.h"


size_t  meter_jsonl_tail = (size_t) 64 << 20;
size_t  meter_jsonl_keep = (size_t) 1 << 20;


static int
meter_jsonl_remember(meter_jsonl_t *j, const char *key)
{
    if (j->keys.n >= meter_jsonl_keep) {
        /* the oldest generation goes: those records were settled long ago */
        meter_map_free(&j->old, NULL);
        j->old = j->keys;

        if (meter_map_init(&j->keys, 1024) != 0) {
            memset(&j->keys, 0, sizeof(meter_map_t));
            return -1;
        }
    }

    return meter_map_put(&j->keys, key, NULL) != NULL ? 0 : -1;
}


/*
 * The value of "idempotency_key" in a line the worker wrote: exactly one
 * such member, its value plain [0-9a-f] (no escapes); NULL otherwise
 * (then the caller parses the line).
 */
static const char *
meter_jsonl_key(const char *line, char *buf, size_t size)
{
    size_t       n;
    const char  *p, *e;

    p = strstr(line, "\"idempotency_key\":\"");
    if (p == NULL || strstr(p + 1, "\"idempotency_key\"") != NULL) {
        return NULL;
    }

    p += sizeof("\"idempotency_key\":\"") - 1;
    e = p + strspn(p, "0123456789abcdef");
    n = (size_t) (e - p);

    if (*e != '"' || n == 0 || n >= size) {
        return NULL;
    }

    memcpy(buf, p, n);
    buf[n] = '\0';

    return buf;
}


static int
meter_jsonl_scan(meter_jsonl_t *j, char *err, size_t errlen)
{
    FILE         *f;
    char         *line;
    size_t        cap;
    ssize_t       n;
    off_t         good;
    char          kbuf[128];
    const char   *k;
    cJSON        *json;
    const cJSON  *key;

    line = NULL;
    cap = 0;
    good = 0;

    f = fopen(j->path, "r");
    if (f == NULL) {
        snprintf(err, errlen, "cannot read \"%s\": %s", j->path,
                 strerror(errno));
        return -1;
    }

    /* the tail only; its first line may be cut: skip it */
    if (fseeko(f, 0, SEEK_END) == 0 && ftello(f) > (off_t) meter_jsonl_tail)
    {
        good = ftello(f) - (off_t) meter_jsonl_tail;

        if (fseeko(f, good, SEEK_SET) != 0) {
            fclose(f);
            snprintf(err, errlen, "cannot seek \"%s\": %s", j->path,
                     strerror(errno));
            return -1;
        }

        n = getline(&line, &cap, f);
        if (n > 0 && line[n - 1] == '\n') {
            good += n;
        }

    } else {
        rewind(f);
    }

    while ((n = getline(&line, &cap, f)) != -1) {
        if (line[n - 1] != '\n') {
            break;
        }

        good += n;

        /* our own lines: the key found without a parse (a start with a
         * million lines would spend seconds in cJSON) */
        k = meter_jsonl_key(line, kbuf, sizeof(kbuf));
        json = NULL;

        if (k == NULL) {
            json = cJSON_Parse(line);
            key = cJSON_GetObjectItemCaseSensitive(json, "idempotency_key");
            k = (cJSON_IsString(key) && key->valuestring != NULL)
                ? key->valuestring : NULL;
        }

        if (k != NULL && meter_jsonl_remember(j, k) != 0) {
            cJSON_Delete(json);
            free(line);
            fclose(f);
            snprintf(err, errlen, "out of memory");
            return -1;
        }

        cJSON_Delete(json);
    }

    free(line);
    fclose(f);

    if (ftruncate(j->fd, good) != 0) {
        snprintf(err, errlen, "cannot truncate \"%s\": %s", j->path,
                 strerror(errno));
        return -1;
    }

    return 0;
}


int
meter_jsonl_open(meter_jsonl_t *j, const char *path, char *err,
    size_t errlen)
{
    struct stat  st;

    memset(j, 0, sizeof(meter_jsonl_t));
    j->fd = -1;

    j->path = strdup(path);
    if (j->path == NULL || meter_map_init(&j->keys, 1024) != 0
        || meter_map_init(&j->old, 16) != 0)
    {
        snprintf(err, errlen, "out of memory");
        goto failed;
    }

    /* a FIFO blocks here until its reader opens it, as it should */
    j->fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    if (j->fd == -1) {
        snprintf(err, errlen, "cannot open \"%s\": %s", path,
                 strerror(errno));
        goto failed;
    }

    if (fstat(j->fd, &st) != 0) {
        snprintf(err, errlen, "cannot stat \"%s\": %s", path,
                 strerror(errno));
        goto failed;
    }

    j->regular = S_ISREG(st.st_mode);

    if (j->regular && meter_jsonl_scan(j, err, errlen) != 0) {
        goto failed;
    }

    return 0;

failed:

    meter_jsonl_close(j);

    return -1;
}


int
meter_jsonl_has(meter_jsonl_t *j, const char *key)
{
    return meter_map_get(&j->keys, key) != NULL
           || meter_map_get(&j->old, key) != NULL;
}


int
meter_jsonl_write(meter_jsonl_t *j, const char *key, const char *line,
    size_t len, char *err, size_t errlen)
{
    if (meter_jsonl_append(j, line, len, err, errlen) != 0) {
        return -1;
    }

    return meter_jsonl_commit(j, &key, 1, err, errlen);
}


int
meter_jsonl_append(meter_jsonl_t *j, const char *line, size_t len, char *err,
    size_t errlen)
{
    ssize_t  n;
    size_t   done;
    off_t    end;

    end = j->regular ? lseek(j->fd, 0, SEEK_END) : 0;
    done = 0;

    while (done < len) {
        n = write(j->fd, line + done, len - done);

        if (n == -1 && errno == EINTR) {
            continue;
        }

        if (n <= 0) {
            snprintf(err, errlen, "cannot write \"%s\": %s", j->path,
                     n == 0 ? "short write" : strerror(errno));

            /* never leave a torn line that a later line would glue onto */
            if (j->regular && end >= 0 && ftruncate(j->fd, end) != 0) {
                meter_log(LOG_ERR, "cannot truncate \"%s\": %s", j->path,
                          strerror(errno));
            }

            return -1;
        }

        done += (size_t) n;
    }

    return 0;
}


int
meter_jsonl_commit(meter_jsonl_t *j, const char *const *keys, size_t n,
    char *err, size_t errlen)
{
    size_t  i;

    /* pipes and ttys cannot be synced; their reader is the durability */
    if (fsync(j->fd) != 0 && errno != EINVAL && errno != ENOTSUP) {
        snprintf(err, errlen, "cannot fsync \"%s\": %s", j->path,
                 strerror(errno));
        return -1;
    }

    for (i = 0; i < n; i++) {
        if (meter_jsonl_remember(j, keys[i]) != 0) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
    }

    return 0;
}


void
meter_jsonl_close(meter_jsonl_t *j)
{
    if (j->fd != -1) {
        close(j->fd);
        j->fd = -1;
    }

    free(j->path);
    j->path = NULL;
    meter_map_free(&j->keys, NULL);
    meter_map_free(&j->old, NULL);
}
