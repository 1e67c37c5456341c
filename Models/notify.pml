/*
 * The notification handshake of a split virtqueue with VIRTIO_F_EVENT_IDX, both ways of
 * RingFence's DriverQueue.publish() / DeviceQueue.enableNotifications():
 *
 *   driver: avail.idx = new (release); FENCE; ev = used->avail_event;
 *           if vring_need_event(ev, new, old) kick
 *   device: avail_event = last_avail; FENCE; if avail.idx != last_avail: work
 *           else sleep until kicked
 *
 * Each side's store goes through a one-entry store buffer that drains at any moment (a
 * TSO machine such as x86). FENCE waits for the buffer to drain (the seq_cst fence).
 * The monitor asserts there is never a lost wake-up: the device asleep, no kick pending,
 * the driver finished, and work left in the ring.
 *
 * The same handshake guards the other direction (device publishes used.idx, driver
 * re-arms with used_event in enableInterrupts()): the roles are symmetric.
 *
 * `spin -a notify.pml` must verify with no errors; `spin -a -DNOFENCE notify.pml` must
 * find the lost wake-up (proof that the model can fail). scripts/check-models runs both.
 */
#define N 4               /* requests the driver publishes */
#define MOD 256

byte avail_idx = 0;       /* shared, written by the driver */
byte avail_event = 0;     /* shared, written by the device */
bool kick = false;        /* the eventfd: pending or not */

bool pending_d = false;   /* driver's store buffer: avail_idx */
byte buf_d;
bool pending_v = false;   /* device's store buffer: avail_event */
byte buf_v;

bool driver_done = false;
bool sleeping = false;
byte consumed = 0;        /* device-private last_avail */

#ifdef NOFENCE
#define FENCE_D skip
#define FENCE_V skip
#else
#define FENCE_D (!pending_d)
#define FENCE_V (!pending_v)
#endif

/* vring_need_event(event, new, old): (u16)(new - event - 1) < (u16)(new - old) */
#define NEED_EVENT(ev, nw, od) (((nw) - (ev) - 1 + 2*MOD) % MOD < ((nw) - (od) + 2*MOD) % MOD)

active proctype Driver() {
    byte published = 0;   /* private copy (R1: never read back from the ring) */
    byte old;
    byte ev;
    do
    :: published < N ->
        old = published;
        published = published + 1;
        (!pending_d);                                    /* one-entry buffer */
        atomic { buf_d = published; pending_d = true }   /* avail.idx = new (release) */
        FENCE_D;
        ev = avail_event;                                /* single fetch */
        if
        :: NEED_EVENT(ev, published, old) -> kick = true
        :: else -> skip
        fi
    :: else -> break
    od;
    (!pending_d);
    driver_done = true
}

active proctype Device() {
    byte idx;
    do
    :: idx = avail_idx;
       if
       :: consumed != idx -> consumed = consumed + 1      /* serve one chain */
       :: else ->
           (!pending_v);
           atomic { buf_v = consumed; pending_v = true }   /* avail_event = last_avail */
           FENCE_V;
           idx = avail_idx;
           if
           :: consumed != idx -> skip                       /* recheck found work */
           :: else ->
               sleeping = true;
end_sleep:     kick;                                        /* block until kicked */
               atomic { kick = false; sleeping = false }
           fi
       fi
    od
}

/* The store buffers drain in the background, at any time. */
active proctype Memory() {
end_memory:
    do
    :: atomic { pending_d -> avail_idx = buf_d; pending_d = false }
    :: atomic { pending_v -> avail_event = buf_v; pending_v = false }
    od
}

active proctype Monitor() {
end_monitor:
    atomic {
        driver_done && sleeping && !kick && !pending_v && consumed != avail_idx ->
        assert(false)   /* lost wake-up */
    }
}
