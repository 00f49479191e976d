//! Tax-server driver.
