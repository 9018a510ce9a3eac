
/*
 * Copyright (C) nginx-meter authors
 *
 * Many requests of one provider at once, on the worker's one thread:
 * libcurl's multi interface (curl_multi_poll), a pool of max_in_flight easy
 * handles sharing the multi handle's connection cache (keep-alive) and
 * HTTP/2 multiplexing where the server offers it.  Each request keeps the
 * retries and classification of meter_http_request() (http.c); what is
 * shared is the pace: the token bucket of max_rps and the pause after a
 * 429, which holds back every request of the provider, so that the ones
 * open at the same time do not all come back at once.
 *
 * Why not threads: the drain loop's Redis connection, its exactly-once
 * steps and the providers' caches stay single-threaded; see
 * docs/worker-concurrency.md.
 */


#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

#include "http.h"


enum {
    METER_JOB_WAITING = 0,
    METER_JOB_OPEN,
    METER_JOB_DONE
};


static int meter_http_multi_init(meter_http_t *h);
static int meter_http_serial_busy(meter_http_job_t *jobs, size_t n,
    const meter_http_job_t *job);
static int meter_http_start(meter_http_t *h, meter_http_job_t *job);
static void meter_http_finish(meter_http_t *h, meter_http_job_t *job,
    CURLcode cc, size_t *left);


static int
meter_http_multi_init(meter_http_t *h)
{
    if (h->multi != NULL) {
        return 0;
    }

    h->pool = calloc((size_t) h->max_in_flight, sizeof(CURL *));
    if (h->pool == NULL) {
        return -1;
    }

    h->multi = curl_multi_init();
    if (h->multi == NULL) {
        free(h->pool);
        h->pool = NULL;
        return -1;
    }

    curl_multi_setopt(h->multi, CURLMOPT_PIPELINING, (long) CURLPIPE_MULTIPLEX);
    curl_multi_setopt(h->multi, CURLMOPT_MAX_HOST_CONNECTIONS,
                      (long) h->max_in_flight);
    curl_multi_setopt(h->multi, CURLMOPT_MAXCONNECTS,
                      (long) h->max_in_flight);

    return 0;
}


/* another job with the same serial key is open */
static int
meter_http_serial_busy(meter_http_job_t *jobs, size_t n,
    const meter_http_job_t *job)
{
    size_t  i;

    if (job->serial == NULL) {
        return 0;
    }

    for (i = 0; i < n; i++) {
        if (jobs[i].state == METER_JOB_OPEN && jobs[i].serial != NULL
            && strcmp(jobs[i].serial, job->serial) == 0)
        {
            return 1;
        }
    }

    return 0;
}


static int
meter_http_start(meter_http_t *h, meter_http_job_t *job)
{
    CURL  *c;

    if (h->npool > 0) {
        c = h->pool[--h->npool];

    } else {
        c = curl_easy_init();
        if (c == NULL) {
            snprintf(job->resp.error, sizeof(job->resp.error),
                     "curl_easy_init() failed");
            return -1;
        }

        h->nmade++;
    }

    if (meter_http_easy_prepare(h, c, job->req, &job->resp, &job->hl) != 0) {
        h->pool[h->npool++] = c;
        return -1;
    }

    /* over TLS, wait for a connection that may multiplex (HTTP/2) rather
     * than open another; plain http is HTTP/1.1, where waiting would
     * only serialize the requests */
    if (strncmp(job->req->url, "https:", 6) == 0) {
        curl_easy_setopt(c, CURLOPT_PIPEWAIT, 1L);
    }
    curl_easy_setopt(c, CURLOPT_PRIVATE, (void *) job);

    if (curl_multi_add_handle(h->multi, c) != CURLM_OK) {
        meter_http_easy_release(c, job->hl);
        job->hl = NULL;
        h->pool[h->npool++] = c;
        snprintf(job->resp.error, sizeof(job->resp.error),
                 "curl_multi_add_handle() failed");
        return -1;
    }

    job->easy = c;
    job->state = METER_JOB_OPEN;
    job->attempts++;
    job->resp.attempts = job->attempts;

    meter_send_stats.in_flight++;
    if (meter_send_stats.in_flight > meter_send_stats.in_flight_max) {
        meter_send_stats.in_flight_max = meter_send_stats.in_flight;
    }

    return 0;
}


/* one answer (or transport failure): done, or waiting for its retry */
static void
meter_http_finish(meter_http_t *h, meter_http_job_t *job, CURLcode cc,
    size_t *left)
{
    double  delay;
    CURL   *c;

    c = job->easy;

    if (cc != CURLE_OK) {
        /* curl's messages name the host, never the credentials */
        snprintf(job->resp.error, sizeof(job->resp.error), "%s",
                 curl_easy_strerror(cc));
        job->resp.status = 0;

    } else {
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &job->resp.status);
    }

    curl_multi_remove_handle(h->multi, c);
    meter_http_easy_release(c, job->hl);
    job->hl = NULL;
    job->easy = NULL;
    h->pool[h->npool++] = c;
    meter_send_stats.in_flight--;

    delay = 0;

    if (meter_http_next(h, &job->resp, &job->res, job->attempts, &delay)) {
        job->state = METER_JOB_WAITING;
        job->not_before = meter_http_now() + delay;

        if (job->resp.status == 429) {
            /* after the shared pause, spread over up to a second */
            job->not_before = h->pause_until
                              + (delay < 2 ? delay / 2 : 1)
                                * ((double) random() / RAND_MAX);
        }

        return;
    }

    job->st = job->res.status;
    meter_http_give_up(h, &job->resp, &job->res, job->st);
    job->state = METER_JOB_DONE;
    (*left)--;
}


void
meter_http_request_many(meter_http_t *h, meter_http_job_t *jobs, size_t n)
{
    int          open, running, numfds, ms;
    size_t       i, left, first;
    double       now, wake, wait;
    CURLMsg     *msg;
    meter_http_job_t    *job;
    meter_send_result_t  pres;

    for (i = 0; i < n; i++) {
        jobs[i].state = METER_JOB_WAITING;
        jobs[i].attempts = 0;
        jobs[i].not_before = 0;
        jobs[i].easy = NULL;
        jobs[i].hl = NULL;
        jobs[i].st = METER_SEND_RETRY;
        memset(&jobs[i].res, 0, sizeof(meter_send_result_t));
        jobs[i].resp.status = 0;
        jobs[i].resp.attempts = 0;
        jobs[i].resp.error[0] = '\0';
    }

    if (n == 0) {
        return;
    }

    if (n == 1 || h->max_in_flight == 1) {
        /* one at a time anyway: the plain path (and the unit tests' seam,
         * meter_http_perform) */
        for (i = 0; i < n; i++) {
            jobs[i].st = meter_http_request(h, jobs[i].req, &jobs[i].resp,
                                            &jobs[i].res);
            jobs[i].state = METER_JOB_DONE;
        }

        return;
    }

    if (meter_http_multi_init(h) != 0) {
        for (i = 0; i < n; i++) {
            jobs[i].res.status = METER_SEND_RETRY;
            snprintf(jobs[i].res.error, sizeof(jobs[i].res.error),
                     "%s: out of memory", h->name);
        }

        return;
    }

    left = n;
    first = 0;
    open = 0;

    while (left > 0) {
        now = meter_http_now();
        wake = now + 0.2;

        memset(&pres, 0, sizeof(pres));
        wait = meter_http_paused(h, &pres);

        if (wait < 0) {
            /* paused past retry_cap: what has not started goes back to
             * the drain loop, scheduled after the pause */
            for (i = first; i < n; i++) {
                if (jobs[i].state == METER_JOB_WAITING) {
                    jobs[i].res = pres;
                    jobs[i].st = METER_SEND_RETRY;
                    jobs[i].state = METER_JOB_DONE;
                    left--;
                }
            }

        } else if (wait > 0) {
            wake = now + wait;

        } else {
            while (first < n && jobs[first].state == METER_JOB_DONE) {
                first++;
            }

            for (i = first; i < n && open < h->max_in_flight; i++) {
                job = &jobs[i];

                if (job->state != METER_JOB_WAITING) {
                    continue;
                }

                if (job->not_before > now) {
                    if (job->not_before < wake) {
                        wake = job->not_before;
                    }

                    continue;
                }

                if (meter_http_serial_busy(jobs, n, job)) {
                    continue;
                }

                wait = meter_http_token(h);
                if (wait > 0) {
                    if (now + wait < wake) {
                        wake = now + wait;
                    }

                    break;
                }

                if (meter_http_start(h, job) != 0) {
                    job->st = METER_SEND_RETRY;
                    job->res.status = METER_SEND_RETRY;
                    snprintf(job->res.error, sizeof(job->res.error), "%s: %s",
                             h->name, job->resp.error);
                    job->state = METER_JOB_DONE;
                    left--;
                    continue;
                }

                open++;
            }
        }

        if (left == 0) {
            break;
        }

        (void) curl_multi_perform(h->multi, &running);

        while ((msg = curl_multi_info_read(h->multi, &running)) != NULL) {
            if (msg->msg != CURLMSG_DONE) {
                continue;
            }

            job = NULL;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE,
                              (char **) &job);
            if (job == NULL) {
                continue;
            }

            open--;
            meter_http_finish(h, job, msg->data.result, &left);
            wake = now;
        }

        if (left == 0) {
            break;
        }

        now = meter_http_now();
        ms = wake > now ? (int) ((wake - now) * 1000) + 1 : 0;
        if (ms > 200) {
            ms = 200;
        }

        if (ms > 0 || open > 0) {
            (void) curl_multi_poll(h->multi, NULL, 0, ms, &numfds);
        }
    }
}
